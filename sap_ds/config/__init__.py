"""The run configuration: its schema (run.py), the methods' sections (methods.py) and how config
files, ``base:`` chains and ``key=value`` overrides are read (reading.py)."""
