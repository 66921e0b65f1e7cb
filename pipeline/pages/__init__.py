"""What a person reads: the self-contained HTML pages (built from page.py's blocks: inline CSS, data: URI
images, no external URL), the run report, the export page and the export folder's model card."""
