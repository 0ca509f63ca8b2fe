"""Generated Tether API (see protos/generate.py)."""
