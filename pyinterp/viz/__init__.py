"""Pictures: heatmaps, grids and line charts as images (``plot``), their labels (``text``), attention sheets
(``attention``) and the HTML feature dashboard (``dashboard``)."""
