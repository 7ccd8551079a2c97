"""One module per `hetero` subcommand; see hetero/cli.py."""
