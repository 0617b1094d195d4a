"""Reading and writing photos and videos safely (images, video), atomic output (atomic), output paths (paths),
and the batch runner behind every command (batch)."""
