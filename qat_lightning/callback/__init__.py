"""qat_lightning.callback (see DESIGN.md)."""
