"""Small helpers shared by both servers: config loading, logging, server lifecycle."""
