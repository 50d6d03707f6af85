"""postctl: the operator's command line (see postctl/cli.py)."""
