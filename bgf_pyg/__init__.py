"""bgf_pyg."""
