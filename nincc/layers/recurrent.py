"""Layer family: recurrent (entries registered into the table)."""
