"""Running the site processor: its process tree under a subreaper, its limits, its output."""
