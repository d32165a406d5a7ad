"""The `onetower` command line (composes training and service sub-commands)."""
