"""Serving adapters for InternVL-U: an OpenAI-compatible HTTP server and an MCP server.

Like ``nodes/`` and ``agent_tools/``, this package only uses ``internvl_u_core``'s public API and
is never imported by the core or by the other adapters. Its commands reach ``internvl-u`` through
the ``internvl_u.commands`` entry-point group.
"""
