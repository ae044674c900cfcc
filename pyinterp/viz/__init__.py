"""Pictures: heatmaps, grids and line charts as images (``plot``), their labels (``text``) and attention sheets
(``attention``)."""
