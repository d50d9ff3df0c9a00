//! Connection arguments shared by the subcommands that reach a target (being written).
