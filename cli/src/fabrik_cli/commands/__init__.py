"""Click wiring of the `fabrik` subcommands, one module per area; the logic lives elsewhere."""
