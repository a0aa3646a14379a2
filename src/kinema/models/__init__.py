"""Model definitions. Parameter names equal the official checkpoint keys."""
