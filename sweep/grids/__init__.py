"""Grid definitions as data files (JSON or TOML); see `sweep.grids` module docs for the format."""
