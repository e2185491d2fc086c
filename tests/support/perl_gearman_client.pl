#!/usr/bin/perl
# One foreground job with Perl's Gearman::Client (Debian libgearman-client-perl):
#   perl_gearman_client.pl HOST:PORT FUNCTION TIMEOUT_SECONDS < payload > reply
# Exit status 3 when the job failed or timed out.
use strict;
use warnings;
use Gearman::Client;

my ($server, $function, $timeout) = @ARGV;
die "usage: $0 HOST:PORT FUNCTION TIMEOUT\n" unless defined $timeout;
binmode STDIN;
binmode STDOUT;
my $payload = do { local $/; <STDIN> };
my $client = Gearman::Client->new(job_servers => [$server]);
my $reply = $client->do_task($function, $payload, {timeout => $timeout});
if (!defined $reply) {
    print STDERR "Gearman::Client: no reply from $function (failed or timed out)\n";
    exit 3;
}
print $$reply;
