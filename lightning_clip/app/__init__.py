"""The application that ships with lightning-clip, apart from the library.

* :mod:`lightning_clip.app.cli` -- the ``lightning-clip`` console command (``demo`` and ``report``).
* :mod:`lightning_clip.app.report` -- reads, summarizes and plots the gradient norms that
  :class:`~lightning_clip.GradientClipping` wrote to TensorBoard: loading in :mod:`~lightning_clip.app.report_data`,
  the table (and the one column formatter, ``format_rows``) in :mod:`~lightning_clip.app.report_table`, the plots
  (matplotlib: the ``report`` extra) in :mod:`~lightning_clip.app.report_plot`.
* :mod:`lightning_clip.app.models` -- the example models and synthetic data (the exploding
  :class:`~lightning_clip.app.models.DeepMLP`), for the demo, the examples, the benchmarks and the tests.

The library needs none of it: ``import lightning_clip`` does not import this package.
"""
