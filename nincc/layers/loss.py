"""Layer family: loss (entries registered into the table)."""
