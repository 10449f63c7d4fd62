"""Layer family: common (entries registered into the table)."""
