"""Generated code for the tether.v1 protos. Do not edit: run protos/generate.py."""
