"""qat_lightning.surgery (see DESIGN.md)."""
