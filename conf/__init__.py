"""DeltaNMF's configuration, ``conf/``: installed as the package ``deltanmf.conf`` (see
pyproject.toml), so that an installed copy (a wheel) finds it too."""
