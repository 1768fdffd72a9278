"""Who is calling: gateway tokens verified to a principal, and the identity provider's keys."""
