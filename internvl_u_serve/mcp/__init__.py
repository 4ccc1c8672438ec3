"""`internvl-u mcp`: InternVL-U's understand, reason, generate and edit as MCP tools.

`server.build_server` makes the server over a loaded model; `command` adds the CLI subcommand
(and imports nothing heavy, so `internvl-u --help` stays fast without the `mcp` extra).
"""
