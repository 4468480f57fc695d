"""The service's routes, one router per audience: users' jobs, the job drivers, and operations."""
