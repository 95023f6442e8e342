"""Everything a run reports: results.json and report.md (report), the deployment studies'
sections and the accuracy-cost frontier (deploy_sections, frontier), paired intervals
(stats, comparisons), number formats (formats), and tables over several runs (aggregate,
aggregate_deploy: `python -m mmpg_jax.reporting.aggregate`)."""
