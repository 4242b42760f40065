"""Report pages: OUT/report.html per run, ROOT/report.html per sweep; one self-contained HTML file each
(images inlined), readable offline. Readers of the files only: they import the contract, never a stage,
and the pipeline (a run) or the sweep driver calls them after each step."""

from gdd_ray.report_page.run_page import PAGE, write_run_page

__all__ = ["PAGE", "write_run_page"]
