"""The family report: what a run tree measured, as Markdown, PNG plots and a summary.json.

- `pareto`: the cost–quality Pareto front as pure functions of points.
- `runtree`: reading a run tree (stages by their meta.json), model lineage, one row per evaluated model.
- `tables`: Markdown tables and the data selections they share with the plots.
- `plots`: the PNG figures (matplotlib, no pyplot).
- `stage`: ``famex report RUN_DIR --out REPORT_DIR``.

Importing this package imports no plotting library.
"""
