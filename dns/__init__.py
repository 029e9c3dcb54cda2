"""DNS resolver for ``<service>.svc.mesh`` names: a sans-IO core and a Trio server.

The resolver is built by the DNS issue; this package holds its place in the layout.
"""
