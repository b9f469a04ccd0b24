"""One module per command: `run(args, argv)` turns the parsed arguments into settings and runs it.

cli.py parses the command line and picks the module; nothing here parses arguments.
"""
