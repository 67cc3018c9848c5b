"""The dispatcher: reads the intake stream, predicts, admits, and routes each request."""
