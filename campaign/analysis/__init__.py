"""From Parquet to answers, without torch or Ray: statistics, the campaign as DuckDB views, the
summary and the baseline-vs-text comparison, and their rendering (Markdown, HTML, JSON, plots)."""
