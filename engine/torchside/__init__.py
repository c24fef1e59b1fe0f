"""The torch side: the real architecture built with the options applied, the optimizers torch does not
ship, and allocation-exact stand-ins for bitsandbytes. Shared by the tracer and the live run; torch is
imported inside functions, so importing these modules stays cheap."""
