"""The wire schemas and the array codec (``protos``): plain values, no services, no fixtures yet."""
