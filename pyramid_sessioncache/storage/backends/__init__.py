"""The Beaker namespaces the add-on provides or extends, one module each."""
