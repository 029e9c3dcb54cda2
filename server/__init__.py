"""Server cluster: stores, CA, agent sync, management API, leader duties."""
