"""Clients: add-client, remove-client and list-clients, and what they write for a client."""
