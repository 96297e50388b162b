"""The evaluation report: each experiment's section and the shipped models' comparison, rendered into REPORT.md."""
