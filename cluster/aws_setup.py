"""One-time AWS set-up for cluster/aws.yaml: IAM instance profiles and the cluster's firewall.

    python cluster/aws_setup.py --bucket my-regft-bucket --region us-west-2 \\
        --ssh-cidr "$(curl -s https://checkip.amazonaws.com)/32"

Creates (idempotent; existing resources are kept and their policies updated):
- instance profile + role `regft-ray-head`: EC2 (the autoscaler launches workers), read/write on
  the bucket, and iam:PassRole for the worker role only;
- instance profile + role `regft-ray-worker`: read/write on the bucket, nothing else;
- security group `regft-ray` in the region's default VPC: all traffic between members, SSH
  only from --ssh-cidr. Ray's own bootstrap would open SSH to 0.0.0.0/0; it leaves a group
  that already has rules alone.

Nodes get AWS credentials from their instance profile: no keys in any file. Needs boto3 and
credentials allowed to create IAM roles and security groups (your laptop's AWS profile).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys

HEAD, WORKER, GROUP = "regft-ray-head", "regft-ray-worker", "regft-ray"
EC2_POLICY = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"
TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def bucket_policy(bucket: str) -> dict:
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                       "s3:AbortMultipartUpload"],
         "Resource": f"arn:aws:s3:::{bucket}/*"},
    ]}


def _role_with_profile(iam, name: str) -> str:
    """Create role + instance profile `name` (if missing); return the role's ARN."""
    try:
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST),
                              Description="regft Ray cluster nodes (cluster/aws_setup.py)")["Role"]["Arn"]
    except iam.exceptions.EntityAlreadyExistsException:
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
    try:
        iam.create_instance_profile(InstanceProfileName=name)
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
    if not any(r["RoleName"] == name for r in roles):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return arn


def setup_iam(iam, bucket: str) -> dict[str, str]:
    worker_arn = _role_with_profile(iam, WORKER)
    iam.put_role_policy(RoleName=WORKER, PolicyName="regft-s3",
                        PolicyDocument=json.dumps(bucket_policy(bucket)))
    head_arn = _role_with_profile(iam, HEAD)
    iam.put_role_policy(RoleName=HEAD, PolicyName="regft-s3",
                        PolicyDocument=json.dumps(bucket_policy(bucket)))
    iam.put_role_policy(RoleName=HEAD, PolicyName="regft-pass-worker-role", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iam:PassRole", "Resource": worker_arn}]}))
    iam.attach_role_policy(RoleName=HEAD, PolicyArn=EC2_POLICY)
    return {"head_role": head_arn, "worker_role": worker_arn}


def setup_security_group(ec2, ssh_cidr: str) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SystemExit("error: this region has no default VPC; create the security group "
                         f"{GROUP!r} yourself in the VPC of your subnets (see the docstring)")
    vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [GROUP]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])
    if found["SecurityGroups"]:
        sg = found["SecurityGroups"][0]
        sg_id = sg["GroupId"]
        if sg["IpPermissions"]:  # never widen or narrow a group someone configured
            return sg_id
    else:
        sg_id = ec2.create_security_group(GroupName=GROUP, VpcId=vpc_id,
                                          Description="regft Ray cluster: intra-cluster + SSH")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg_id, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg_id}]},  # node <-> node
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": ssh_cidr, "Description": "ray up / ray attach"}]},
    ])
    return sg_id


def check_cidr(cidr: str) -> str | None:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return f"--ssh-cidr {cidr!r}: not a CIDR; pass your address, e.g. 203.0.113.7/32"
    if net.prefixlen < 16:
        return (f"--ssh-cidr {cidr}: /{net.prefixlen} admits {net.num_addresses} addresses; "
                "pass your own address (/32) or your office range")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/aws_setup.py", description=__doc__.split("\n")[0])
    p.add_argument("--bucket", required=True, help="S3 bucket for --storage s3://BUCKET/...")
    p.add_argument("--region", required=True, help="the region of cluster/aws.yaml's provider")
    p.add_argument("--ssh-cidr", required=True, help="where `ray up` connects from, e.g. 203.0.113.7/32")
    args = p.parse_args(argv)
    problem = check_cidr(args.ssh_cidr)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import boto3

    roles = setup_iam(boto3.client("iam", region_name=args.region), args.bucket)
    sg_id = setup_security_group(boto3.client("ec2", region_name=args.region), args.ssh_cidr)
    print(f"instance profiles {HEAD}, {WORKER} ({roles['worker_role']}); security group {GROUP} "
          f"({sg_id}, SSH from {args.ssh_cidr}); bucket access: s3://{args.bucket}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
