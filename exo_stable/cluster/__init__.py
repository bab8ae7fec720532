"""Cluster membership: how nodes find each other (mDNS discovery and static peer lists)."""
