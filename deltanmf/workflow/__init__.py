"""The edge: the Hydra configuration turned into typed settings (:mod:`.config`), the command
line's entry point (:mod:`.main`), one run from settings to files (:mod:`.run`, :mod:`.outputs`,
:mod:`.resume`), sweeps (:mod:`.sweeps`) and the Python API (:mod:`.api`)."""
