"""Reading the inputs, the output schema, and writing selected/, scores/, rejected/ and clusters/."""
