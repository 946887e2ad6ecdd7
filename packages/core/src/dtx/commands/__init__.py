"""The command-line face of the core: one module per `dtx` subcommand (registered by ``dtx.builtin``)."""
