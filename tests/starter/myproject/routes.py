def includeme(config):
    config.add_route("home", "/")
    # Added for the add-on's tests: a list read through FromCache, and a form that adds to it.
    config.add_route("models", "/models")
