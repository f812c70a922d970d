"""One module per stage; each reads top to bottom (config in, one loop, artifacts out)."""
