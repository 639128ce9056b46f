"""Storage: fsspec filesystems and URLs in one place, and the output lease."""
