"""Built-in plugins. Each module is published under the `geobench` entry-point group in
setup.cfg, the same way a third-party package publishes its own."""
