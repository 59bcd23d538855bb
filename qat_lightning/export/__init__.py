"""qat_lightning.export (see DESIGN.md)."""
