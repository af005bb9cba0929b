"""Work built on the pipeline: screening runs, distributed runs, tracking, spot assignment."""
