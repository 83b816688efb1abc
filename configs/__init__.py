"""Commented YAML configs to copy and edit (`beamsift init` writes the DSIR template)."""
