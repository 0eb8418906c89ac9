"""Summarize and plot the gradient norms that :class:`~lightning_clip.GradientClipping` wrote to TensorBoard.

Reads every directory under a log directory that holds TensorBoard event files (one run per
directory, as TensorBoard itself does) and, for each run and optimizer, the scalars the callback
logs on logging steps:

* ``grad_norm/total`` -- the total gradient norm before clipping: its median, 99th percentile and
  maximum over the logged steps (finite values; non-finite ones are counted apart);
* ``grad_clip/steps``, ``grad_clip/clipped_steps``, ``grad_clip/nonfinite_steps``,
  ``grad_clip/skipped_steps``, ``grad_clip/spike_skips``, ``grad_clip/requested_skips``, ``grad_clip/rollbacks``
  -- cumulative counters: the last logged value is the run's total, and the clipped fraction is
  ``clipped_steps / steps``. Skipped steps are the steps not applied: the non-finite ones (under a policy that
  skips them), the spikes, and the *requested* ones (the steps of a data window a remedy asked to skip);
* ``grad_clip/lr_scale`` (last value) and ``grad_clip/max_norm`` (the clip threshold, plotted);
* under ``nan_policy="rollback"``, the skipped data windows the callback writes beside the event files
  (:func:`lightning_clip.metrics.windows_file`): one per rollback, with the snapshot it restored, so the report
  counts rollbacks after the last logging step too, and the steps they undid (from each snapshot to its bad step);
* gradient health: ``grad_health/vanishing_layers`` (last value: the layers the callback flags as vanishing now)
  and, per layer, ``grad_norm_layer/<layer>``, ``grad_health/grad_ratio/<layer>`` (``||grad W|| / ||W||``) and
  ``grad_health/update_ratio/<layer>`` (``||dW|| / ||W||`` of the last measured update): the depth profile.

Layers are in *depth order*: the order in which the callback logs them (the model's ``named_parameters()``
order), which is the order in which their tags first appear in the event files -- TensorBoard's reader keeps it.

Counters are read at the last *logging* step, so with ``Trainer(log_every_n_steps=n)`` they can
trail the true end of the run by up to ``n - 1`` steps.

Example::

    from lightning_clip.app.report import load_runs, format_table, plot

    runs = load_runs("lightning_logs")      # ReportError if there is nothing to report
    print(format_table(runs, "lightning_logs"))
    plot(runs, "grad_norms.png")            # and grad_norms_depth.png when per-layer tags were logged

The same from a shell: ``lightning-clip report lightning_logs --plot grad_norms.png``.
"""

from lightning_clip.app.report_data import (
    LayerHealth,
    PathLike,
    ReportError,
    RunReport,
    find_run_dirs,
    load_runs,
    percentile,
)
from lightning_clip.app.report_plot import check_matplotlib, depth_path, plot, plot_depth
from lightning_clip.app.report_table import format_rows, format_table

__all__ = [
    "ReportError",
    "RunReport",
    "LayerHealth",
    "PathLike",
    "find_run_dirs",
    "load_runs",
    "format_table",
    "format_rows",
    "plot",
    "plot_depth",
    "depth_path",
    "check_matplotlib",
    "percentile",
]
